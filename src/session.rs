//! Sessions: the validated key, where it is read from in a request, signed tokens, what
//! the sandbox sees of it, and the bounds on creating new ones.

mod admission;
mod extract;
mod forwarding;
mod key;
mod token;

pub use admission::{AdmissionError, SessionAdmission};
pub use extract::{ExtractError, ExtractedSession, SessionExtractor, SessionOrigin};
pub use forwarding::SessionForwarding;
pub use key::{InvalidSessionId, SessionKey, validate};
pub use token::{TokenError, TokenSigner, now_unix};
