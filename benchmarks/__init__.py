"""Benchmarks: each prints ratios measured side by side in one run (`make bench-*`).

Not installed in any image. The 2022 course's designs they compare against live here too.
"""
