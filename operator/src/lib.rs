//! The ModelForwarder operator: not built yet (see the README).
