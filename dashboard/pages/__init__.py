"""The dashboard's pages (``st.navigation`` in ``app.py`` lists them)."""
