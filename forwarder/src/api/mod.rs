//! The wire types every front end shares: OpenAI-shaped chat requests,
//! responses and stream chunks, and the error type with its HTTP mapping.

mod error;
mod types;

pub use error::ApiError;
pub use types::*;
