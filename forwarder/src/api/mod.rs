//! The wire types every front end shares: OpenAI-shaped chat requests,
//! responses and stream chunks, and the error type with its HTTP mapping.

mod error;
pub(crate) mod headers;
mod types;
mod view;

pub use error::ApiError;
pub use headers::HeaderAllow;
pub use types::*;
pub use view::{ChunkView, CompletionView};
