"""What the test modules share, so that no test module imports another.

- :mod:`tests.helpers.processes`: which processes this test run started, the guard that keeps unit tests from
  starting any, running the CLI as a child process, and a stock ``hivemind-dht`` node;
- :mod:`tests.helpers.polling`: waiting for a condition;
- :mod:`tests.helpers.swarm`: peer configs, observers and fast CLI training flags for tests on real peers;
- :mod:`tests.helpers.collectives`: data planes in this process and the fast collective timeouts;
- :mod:`tests.helpers.training`: a tiny model and learnable batches for the training modes;
- :mod:`tests.helpers.records`: a valid peer record on the wire, to be altered;
- :mod:`tests.helpers.codecs`: the options every codec is tested with.

Fixtures and hooks stay in ``tests/conftest.py``; these are plain functions and constants.
"""
