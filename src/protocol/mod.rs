//! The PostgreSQL v3 / Redshift wire protocol pieces idgate speaks itself: the client's startup
//! packets ([`startup`]), the messages idgate writes to a client ([`messages`]) and length-capped
//! framed reads ([`frame`]). After authentication idgate relays opaque bytes and parses nothing.

pub mod frame;
pub mod messages;
pub mod startup;
