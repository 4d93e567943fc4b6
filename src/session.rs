//! Sessions: the validated key, where it is read from in a request, and its short hash.

mod extract;
mod key;

pub use extract::{ExtractError, ExtractedSession, SessionExtractor, SessionOrigin};
pub use key::{InvalidSessionId, SessionKey, validate};
