//! Everything that touches the kernel: loading and pinning the datapath
//! (`datapath`), typed access to its maps (`kernel_maps`), TC attachment
//! without TCX (`clsact`), the pin directory (`pins`), feature probes
//! (`probes`), the conntrack sweep (`conntrack`), and the node's interfaces
//! (`interfaces`, followed by `link_watch`).

pub mod clsact;
pub mod conntrack;
pub mod datapath;
pub mod interfaces;
pub mod kernel_maps;
pub mod link_watch;
pub mod pins;
pub mod probes;
