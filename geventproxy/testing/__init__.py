"""Reference Foo server and client, modelled on the original test-driver programs.

They exist so the proxy can be tested, demonstrated and benchmarked without the
original binaries. The README's "Development" section says what they copy:
the original server's parsing, its replies written in pieces, and its habit of
never closing a connection itself.
"""
