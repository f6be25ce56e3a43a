"""
The filecache daemon: the shared folder, the cache, the responder that
answers requests, admission, the protocol adapters and the twistd plugin.
"""
