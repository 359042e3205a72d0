"""Payments page (see hoptrace.dashboard.payments)."""

from hoptrace.dashboard import payments

payments.render()
