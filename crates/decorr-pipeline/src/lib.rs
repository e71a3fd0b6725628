//! The text-to-image pipeline: prompt encoding, the scheduler loop with classifier-free or
//! decorrelated guidance (METHOD.md Eq. 6), VAE decode, PNG output.
//!
//! Not implemented yet: laid out for issue 5. It exports nothing.
