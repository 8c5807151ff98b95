"""Reference Foo server and client, modelled on the original test-driver programs.

They exist so the proxy can be tested, demonstrated and benchmarked without the
original binaries; see ``/work/shared/PROTOCOL.md`` for the behaviour they copy.
"""
