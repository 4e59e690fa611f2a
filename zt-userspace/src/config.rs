//! Configuration file parsing (owned by the config helper).
