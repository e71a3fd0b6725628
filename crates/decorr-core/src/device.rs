//! Run-time choice of the burn device and of the precision models run in. The CPU backend
//! `flex` is always compiled; `wgpu`, `vulkan` and `cuda` are cargo features (each with burn's
//! kernel fusion and autotuning), and so is `tch` (LibTorch: PyTorch's own kernels, linked from
//! a PyTorch install), so a default (test) build stays lean. [`device_from_env`] is how tests
//! and benchmarks run on another backend (`DECORR_BACKEND`).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::CoreError;

/// The compute backends decorr knows; which are usable depends on the build's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// wgpu (Vulkan/Metal/DX12, WGSL shaders); on a machine without GPU it can run on Mesa's
    /// lavapipe.
    Wgpu,
    /// wgpu pinned to Vulkan with burn's SPIR-V compiler, which reaches tensor cores through
    /// cooperative matrices (Linux, Windows).
    Vulkan,
    /// CUDA, device index 0 unless given.
    Cuda,
    /// LibTorch (PyTorch's kernels: cuDNN, cuBLAS, SDPA): its CUDA device when PyTorch sees
    /// one, else Apple's MPS when there is one, else the CPU.
    Tch,
    /// LibTorch on the CPU, whatever GPU there is.
    TchCpu,
}

impl BackendKind {
    /// The backends compiled into this build.
    pub fn compiled() -> Vec<BackendKind> {
        let mut v = vec![BackendKind::Flex];
        if cfg!(feature = "wgpu") {
            v.push(BackendKind::Wgpu);
        }
        if cfg!(feature = "vulkan") {
            v.push(BackendKind::Vulkan);
        }
        if cfg!(feature = "cuda") {
            v.push(BackendKind::Cuda);
        }
        if cfg!(feature = "tch") {
            v.extend([BackendKind::Tch, BackendKind::TchCpu]);
        }
        v
    }

    /// The cargo feature of decorr-cli that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            BackendKind::Flex => "(none)",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Cuda => "cuda",
            BackendKind::Tch | BackendKind::TchCpu => "tch",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Cuda => "cuda",
            BackendKind::Tch => "tch",
            BackendKind::TchCpu => "tch-cpu",
        })
    }
}

impl FromStr for BackendKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "flex" | "cpu" => Ok(BackendKind::Flex),
            "wgpu" => Ok(BackendKind::Wgpu),
            "vulkan" => Ok(BackendKind::Vulkan),
            "cuda" => Ok(BackendKind::Cuda),
            "tch" | "libtorch" => Ok(BackendKind::Tch),
            "tch-cpu" | "libtorch-cpu" => Ok(BackendKind::TchCpu),
            other => Err(CoreError::UnknownBackend(other.to_string())),
        }
    }
}

/// The device for `kind` (GPU index `index` where it applies), or an error that says which
/// feature to build with.
pub fn select_device(kind: BackendKind, index: usize) -> Result<Device, CoreError> {
    let not_compiled = || {
        let avail: Vec<String> = BackendKind::compiled()
            .iter()
            .map(|b| b.to_string())
            .collect();
        CoreError::BackendNotCompiled(kind.to_string(), kind.feature(), avail.join(", "))
    };
    match kind {
        BackendKind::Flex => Ok(Device::flex()),
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                let _ = index;
                Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
            }
            #[cfg(not(feature = "wgpu"))]
            {
                let _ = index;
                Err(not_compiled())
            }
        }
        BackendKind::Vulkan => {
            #[cfg(feature = "vulkan")]
            {
                let _ = index;
                Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice))
            }
            #[cfg(not(feature = "vulkan"))]
            {
                let _ = index;
                Err(not_compiled())
            }
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                Ok(Device::cuda(index))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = index;
                Err(not_compiled())
            }
        }
        BackendKind::Tch | BackendKind::TchCpu => {
            #[cfg(feature = "tch")]
            {
                tch_device(kind == BackendKind::TchCpu, index)
            }
            #[cfg(not(feature = "tch"))]
            {
                let _ = index;
                Err(not_compiled())
            }
        }
    }
}

/// LibTorch's device: CUDA `index` when PyTorch sees CUDA devices (an index past them is
/// refused), else MPS where PyTorch has it, else the CPU; the CPU alone with `cpu_only`.
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream in favour of cubecl; we use it on purpose.
fn tch_device(cpu_only: bool, index: usize) -> Result<Device, CoreError> {
    if cpu_only {
        return Ok(Device::libtorch());
    }
    let count = tch::Cuda::device_count().max(0) as usize;
    if count > 0 {
        if index >= count {
            return Err(CoreError::NoSuchGpu(index, count));
        }
        return Ok(Device::libtorch_cuda(index));
    }
    if tch::utils::has_mps() {
        return Ok(Device::libtorch_mps());
    }
    Ok(Device::libtorch())
}

/// Whether `device` computes on a CPU (flex, or LibTorch's CPU device): there f32 is the
/// default precision, half precision elsewhere.
pub fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "tch")]
    #[allow(deprecated)]
    if *device == Device::libtorch() {
        return true;
    }
    *device == Device::flex()
}

/// What runs the maths, in words for the user: "LibTorch on CUDA device 0", "flex (CPU)".
pub fn describe(device: &Device) -> String {
    #[cfg(feature = "tch")]
    #[allow(deprecated)]
    {
        if *device == Device::libtorch() {
            return "LibTorch on the CPU".into();
        }
        if *device == Device::libtorch_mps() {
            return "LibTorch on Apple's MPS".into();
        }
        for i in 0..tch::Cuda::device_count().max(0) as usize {
            if *device == Device::libtorch_cuda(i) {
                return format!("LibTorch on CUDA device {i}");
            }
        }
    }
    if *device == Device::flex() {
        return "flex (CPU)".into();
    }
    format!("{device:?}")
}

/// The device named by `DECORR_BACKEND` (default flex; GPU index `DECORR_GPU`, default 0): what
/// the parity tests and benchmarks run on, so that one test build checks another backend
/// (`DECORR_BACKEND=tch-cpu cargo test --features decorr-core/tch ...`). Panics on a name that
/// is unknown or not compiled in: it is read by tests, not by users' commands.
pub fn device_from_env() -> Device {
    let kind: BackendKind = std::env::var("DECORR_BACKEND")
        .map(|s| s.parse().expect("DECORR_BACKEND"))
        .unwrap_or_default();
    let index = std::env::var("DECORR_GPU").map_or(0, |s| s.parse().expect("DECORR_GPU"));
    select_device(kind, index).expect("DECORR_BACKEND")
}

/// The floating-point precision a model's weights and activations are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// What diffusers users run: half precision on a GPU, f32 on the CPU (where f16 has no
    /// fast kernels and decorr's host kernels are f32).
    pub fn default_for(device: &Device) -> Precision {
        if is_cpu(device) {
            Precision::F32
        } else {
            Precision::F16
        }
    }

    /// burn's dtype for this precision.
    pub fn dtype(self) -> burn::tensor::DType {
        use burn::tensor::DType;
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Refuses a precision the device cannot compute in, naming the alternatives.
    pub fn check(self, device: &Device, backend: BackendKind) -> Result<(), CoreError> {
        if device.supports_dtype(self.dtype()) {
            Ok(())
        } else {
            Err(CoreError::UnsupportedPrecision(
                self.to_string(),
                backend.to_string(),
            ))
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(CoreError::UnknownPrecision(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_unknown() {
        assert_eq!("FLEX".parse::<BackendKind>().unwrap(), BackendKind::Flex);
        assert_eq!("cuda".parse::<BackendKind>().unwrap(), BackendKind::Cuda);
        let err = "tpu".parse::<BackendKind>().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("flex"), "{err}");
        assert_eq!(
            "vulkan".parse::<BackendKind>().unwrap(),
            BackendKind::Vulkan
        );
    }

    #[test]
    fn precision_names_and_defaults() {
        assert_eq!("fp16".parse::<Precision>().unwrap(), Precision::F16);
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        let err = "f8".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("f8") && err.contains("f16"), "{err}");
        assert_eq!(Precision::default_for(&Device::flex()), Precision::F32);
        // flex computes in every precision (slowly in half).
        for p in [Precision::F32, Precision::F16, Precision::Bf16] {
            p.check(&Device::flex(), BackendKind::Flex).unwrap();
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_feature_names_the_fix() {
        let err = select_device(BackendKind::Cuda, 0).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn missing_tch_names_its_feature() {
        let err = select_device(BackendKind::TchCpu, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--features tch`") && err.contains("tch-cpu"),
            "{err}"
        );
    }

    #[test]
    fn tch_names_parse() {
        assert_eq!("tch".parse::<BackendKind>().unwrap(), BackendKind::Tch);
        assert_eq!(
            "TCH-CPU".parse::<BackendKind>().unwrap(),
            BackendKind::TchCpu
        );
        assert_eq!(BackendKind::TchCpu.to_string(), "tch-cpu");
    }

    /// LibTorch's CPU device: f32 by default, described as LibTorch on the CPU.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_cpu_is_a_cpu() {
        let d = select_device(BackendKind::TchCpu, 0).unwrap();
        assert!(is_cpu(&d));
        assert_eq!(Precision::default_for(&d), Precision::F32);
        assert!(describe(&d).contains("LibTorch"), "{}", describe(&d));
    }
}
