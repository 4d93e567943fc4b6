//! Sessions: the validated key, where it is read from in a request, and its short hash.

mod key;

pub use key::{InvalidSessionId, SessionKey, validate};
