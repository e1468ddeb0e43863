//! End-to-end tests of the NBD server over Unix sockets.
