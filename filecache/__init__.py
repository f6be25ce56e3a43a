"""
filecache: a Twisted daemon that shares the files of one folder with many
clients at once through a first-in first-out memory cache, and its client.
"""

__version__ = "0.1.0"
