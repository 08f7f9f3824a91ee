//! Front ends: each translates its wire protocol to the pipeline's request
//! and the pipeline's answer back. No pipeline stage lives here.

pub mod http;
