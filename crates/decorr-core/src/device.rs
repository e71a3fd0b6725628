//! Run-time choice of the burn device and of the precision models run in. The CPU backend
//! `flex` is always compiled; `wgpu`, `vulkan` and `cuda` are cargo features (each with burn's
//! kernel fusion and autotuning), so a default (test) build stays lean.

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
        v
    }

    /// Whether this backend runs on a GPU (where half precision is the default).
    pub fn is_gpu(self) -> bool {
        self != BackendKind::Flex
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Cuda => "cuda",
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
        CoreError::BackendNotCompiled(kind.to_string(), avail.join(", "))
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
    }
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
    pub fn default_for(backend: BackendKind) -> Precision {
        if backend.is_gpu() {
            Precision::F16
        } else {
            Precision::F32
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
        assert_eq!(Precision::default_for(BackendKind::Flex), Precision::F32);
        assert_eq!(Precision::default_for(BackendKind::Cuda), Precision::F16);
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
}
