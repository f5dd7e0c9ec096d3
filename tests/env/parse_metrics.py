#!/usr/bin/env python3
"""Reads Prometheus text format on stdin with prometheus_client's parser (so a format error
fails here) and prints the samples as JSON: {"name{label=value,...}": value}."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
