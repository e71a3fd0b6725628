//! With the `tch` feature, records libtorch's folder (from torch-sys's build) as the binary's
//! run-time library path, so `decorr` starts without LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if std::env::var_os("CARGO_FEATURE_TCH").is_some()
        && let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB")
        && std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os != "windows")
    {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
