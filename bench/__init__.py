"""Benchmarks (not tests): ``python -m bench.<name>`` prints one line; ``run()`` returns a dict."""
