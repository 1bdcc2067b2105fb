"""FLARE DXO filters a site can impose through its privacy policy (``local/privacy.json``)."""
