"""Alerts page (see hoptrace.dashboard.alerts_page)."""

from hoptrace.dashboard import alerts_page

alerts_page.render()
