//! Images: references ([`reference`]), the registry client ([`registry`]), the manifest and
//! config documents ([`manifest`]), OCI layout tarballs ([`archive`]) and the node's image
//! store on containerd ([`store`]).

pub mod archive;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod store;
