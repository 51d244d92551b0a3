"""The conformance suite: checks any installed backend against ``spec/CONTRACT.md``.

Installed as ``aggregator_conformance`` (``pip install aggregator-reference[conformance]``);
run it with ``python -m aggregator_conformance --backend NAME``.
"""
