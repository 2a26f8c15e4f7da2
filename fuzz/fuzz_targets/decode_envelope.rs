//! Any datagram decodes to a message or an error (no panic, bounded memory), and whatever
//! decodes re-encodes to a datagram that decodes to the same message.

#![no_main]

use std::cell::RefCell;

use chitchat_uring::wire::{Decoder, encode_envelope};
use libfuzzer_sys::fuzz_target;

thread_local! {
    // Reused across inputs, as the server does, so state leaking between datagrams shows up.
    static DECODER: RefCell<Decoder> = RefCell::new(Decoder::new());
}

fuzz_target!(|data: &[u8]| {
    DECODER.with_borrow_mut(|decoder| {
        if let Ok(message) = decoder.decode_envelope(data) {
            let bytes = encode_envelope(&message).expect("a decoded message is encodable");
            let again = decoder
                .decode_envelope(&bytes)
                .expect("a re-encoded message decodes");
            assert_eq!(again, message);
        }
    });
});
