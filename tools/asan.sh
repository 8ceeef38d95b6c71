#!/usr/bin/env bash
# Build the native modules with AddressSanitizer and Cython's runtime checks on, in their
# own venv and build dir, and run the native tests (tests/test_native_*.py and the futures'
# tests, whose state transitions are native) under ASan.
#
#   tools/asan.sh                 # venv .venv-asan, build dir build/asan
#   ASAN_VENV=/tmp/v tools/asan.sh tests/test_native_queue.py -k cancel
#
# Compiler: $CC/$CXX if set, else gcc/g++ (libasan ships with gcc). With clang, install
# its runtime first (Debian: apt-get install clang libclang-rt-14-dev) and run
#   CC=clang CXX=clang++ tools/asan.sh
# CPython leaks at exit by design, so leak detection is off (detect_leaks=0); the tests
# ask for absurd sizes on purpose, so a failed malloc returns NULL (MemoryError) instead
# of aborting (allocator_may_return_null=1).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ASAN_VENV:-.venv-asan}
BUILD_DIR=${ASAN_BUILD_DIR:-build/asan}
CC=${CC:-gcc}
CXX=${CXX:-g++}
FLAGS="-fsanitize=address -fno-omit-frame-pointer -g"

if [[ "$CC" == clang* ]]; then
  RUNTIME=$("$CC" -print-file-name=libclang_rt.asan-x86_64.so)
else
  RUNTIME=$("$CC" -print-file-name=libasan.so)
fi
if [[ ! -f "$RUNTIME" ]]; then
  echo "asan.sh: no ASan runtime found for $CC ($RUNTIME)" >&2
  exit 2
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# Install the test dependencies, then the package itself built with ASan and the checks.
"$VENV/bin/python" -m pip install --quiet ".[test]" -Cbuild-dir="$BUILD_DIR"
CC="$CC" CXX="$CXX" "$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall . \
  -Cbuild-dir="$BUILD_DIR" \
  -Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false \
  -Ccmake.define.BATCHPROC_DEBUG_CYTHON=ON \
  -Ccmake.define.CMAKE_C_FLAGS="$FLAGS" \
  -Ccmake.define.CMAKE_CXX_FLAGS="$FLAGS" \
  -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" \
  -Ccmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address"

# Check that the extension modules really are instrumented.
# (Importing them needs the runtime preloaded, like the tests below.)
SOS=$(LD_PRELOAD="$RUNTIME" ASAN_OPTIONS=detect_leaks=0 "$VENV/bin/python" - <<'PY'
import importlib.util
for m in ("batch_assembler", "request_queue", "rolling_window", "future_state", "waiting"):
    print(importlib.util.find_spec(f"batchproc._native.{m}").origin)
PY
)
if [[ -z "$SOS" ]]; then
  echo "asan.sh: could not locate the installed extension modules" >&2
  exit 2
fi
for so in $SOS; do
  if [[ $(nm -D "$so" | grep -c __asan_) -eq 0 ]]; then  # not grep -q: SIGPIPE + pipefail
    echo "asan.sh: $so is not built with -fsanitize=address" >&2
    exit 2
  fi
done

if [[ $# -eq 0 ]]; then
  set -- tests/test_native_assembler.py tests/test_native_queue.py tests/test_native_window.py \
    tests/test_futures.py
fi
echo "asan.sh: running $* under $RUNTIME"
LD_PRELOAD="$RUNTIME" \
ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:strict_init_order=1:check_initialization_order=1" \
PYTHONFAULTHANDLER=1 \
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q "$@"
