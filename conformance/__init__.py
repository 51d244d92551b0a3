"""The conformance suite: checks any installed backend against ``spec/CONTRACT.md``.

Installed as ``aggregator_conformance`` (``pip install aggregator-reference[conformance]``);
run it with ``python -m aggregator_conformance --backend NAME`` (``--help`` lists the
suite's options). A deadlock fails, it never hangs: a test that overruns its time
limit (``--timeout``, 300 s by default) stops the run, naming the test and the clauses
it checks, with every thread's stack.
"""
