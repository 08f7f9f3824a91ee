//! End-to-end suite for a real cluster: not built yet (see the README).
