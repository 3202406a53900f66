"""The NBD protocol: a sans-I/O codec, a trio client and a trio server."""
