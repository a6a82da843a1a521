"""``make bench``: digitserve against a LitServe-README baseline, under wrk. See ``bench/run.py``."""
