"""Lookup page (see hoptrace.dashboard.lookup)."""

from hoptrace.dashboard import lookup

lookup.render()
