//! Run-time choice of the burn device. The CPU backend `flex` is always compiled; `wgpu` and
//! `cuda` are cargo features, so a default (test) build stays lean.

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
    /// wgpu (Vulkan/Metal/DX12); on a machine without GPU it can run on Mesa's lavapipe.
    Wgpu,
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
        if cfg!(feature = "cuda") {
            v.push(BackendKind::Cuda);
        }
        v
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_unknown() {
        assert_eq!("FLEX".parse::<BackendKind>().unwrap(), BackendKind::Flex);
        assert_eq!("cuda".parse::<BackendKind>().unwrap(), BackendKind::Cuda);
        let err = "tpu".parse::<BackendKind>().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("flex"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_feature_names_the_fix() {
        let err = select_device(BackendKind::Cuda, 0).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
