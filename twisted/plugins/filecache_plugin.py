"""
The twistd/twist plugin for filecache.  Importing it is cheap: the options
and the service live in L{filecache.daemon.tap}, loaded only when used.
"""

from twisted.application.service import ServiceMaker

filecache = ServiceMaker(
    "filecache",
    "filecache.daemon.tap",
    "Share a folder's files with many clients through a memory cache.",
    "filecache",
)
