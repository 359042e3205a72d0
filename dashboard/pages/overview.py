"""Overview page (see hoptrace.dashboard.overview)."""

from hoptrace.dashboard import overview

overview.render()
