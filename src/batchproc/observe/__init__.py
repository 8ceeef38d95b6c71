"""Exporters of a processor's metrics. ``prometheus`` needs the ``prometheus`` extra and is
imported only when used."""
