//! Reading tensors back to the host, counted. On a GPU backend every read-back waits for the
//! device to finish the work queued before it, so the sampling loop must not read back per step
//! (the host would then wait on the GPU at every step instead of queueing ahead). The pipeline
//! reads back only through these functions, and tests count the reads per generation
//! ([`count`]); clippy (`clippy.toml` of decorr-pipeline and decorr-scheduler) refuses direct
//! `into_data`/`into_scalar` there.

use std::cell::Cell;

use burn::tensor::{Bool, Tensor};

thread_local! {
    static READS: Cell<usize> = const { Cell::new(0) };
}

/// Read-backs made so far on this thread (the sampling loop runs on its caller's thread).
pub fn count() -> usize {
    READS.with(Cell::get)
}

fn counted() {
    READS.with(|r| r.set(r.get() + 1));
}

/// `t`'s values as f32 on the host: one read-back.
#[allow(clippy::disallowed_methods)]
pub fn to_f32_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    counted();
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// Whether every value of `t` is finite: one boolean read back.
#[allow(clippy::disallowed_methods)]
pub fn all_finite<const D: usize>(t: &Tensor<D>) -> bool {
    counted();
    let all: Tensor<1, Bool> = t.clone().is_finite().all();
    all.into_scalar::<bool>()
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;

    #[test]
    fn reads_are_counted_per_thread() {
        let t = Tensor::<2>::from_floats([[1.0, f32::NAN]], &Device::flex());
        let before = count();
        assert!(!all_finite(&t));
        assert_eq!(to_f32_vec(t.clone())[0], 1.0);
        assert_eq!(count(), before + 2);
        std::thread::spawn(|| assert_eq!(count(), 0))
            .join()
            .unwrap();
    }
}
