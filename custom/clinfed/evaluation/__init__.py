"""Measurements on trained models that no site runs in production: the membership-inference
audit (``membership``) and the in-process federation it and ``benchmarks/dp_utility.py`` train
many models with (``federation``)."""
