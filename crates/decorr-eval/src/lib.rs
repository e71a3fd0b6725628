//! Evaluation of the paper's section 6.1: BERTScore recall of VLM captions, FID, omission rate.
//!
//! Not implemented yet: laid out for issue 7. It exports nothing.
