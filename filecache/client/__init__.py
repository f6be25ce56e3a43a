"""
The filecache client: the client protocol, saving downloads, and the
C{filecache-client} command line.
"""
