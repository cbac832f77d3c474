//! `sealfs csi node`: the CSI Identity and Node services (spec v1.12, proto/csi/csi.proto)
//! over gRPC on a unix socket, a thin tonic adapter over [`super::node::Node`]. Driver
//! name [`DRIVER`]; no controller, no stage/unstage (the generated defaults answer
//! UNIMPLEMENTED).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::node::{Node, NodeError};
use super::volume::Publish;

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

use proto::identity_server::{Identity, IdentityServer};
use proto::node_server::{Node as NodeService, NodeServer};

/// The CSI driver name (the CSIDriver object, the kubelet plugin directory).
pub const DRIVER: &str = "csi.sealfs.dev";

/// The socket path of `unix:///PATH` (the form kubelet and the sidecars use).
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, String> {
    match endpoint.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(format!(
            "--endpoint {endpoint:?}: must be unix:///ABSOLUTE/PATH"
        )),
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        let m = e.to_string();
        match e {
            NodeError::InvalidArgument(_) => Status::invalid_argument(m),
            NodeError::PermissionDenied(_) => Status::permission_denied(m),
            NodeError::FailedPrecondition(_) => Status::failed_precondition(m),
            NodeError::AlreadyExists(_) => Status::already_exists(m),
            NodeError::NotFound(_) => Status::not_found(m),
            NodeError::Unavailable(_) => Status::unavailable(m),
            NodeError::Aborted(_) => Status::aborted(m),
            NodeError::Internal(_) => Status::internal(m),
        }
    }
}

#[derive(Clone)]
struct Plugin(Arc<Node>);

impl Plugin {
    /// Node work blocks (mount(2), the mounter's answer): off the runtime's threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.0.clone();
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("node task: {e}")))?
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        Ok(Response::new(proto::GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        // A node-only plugin: no controller service, no topology.
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let ready = self.blocking(|n| Ok(n.ready())).await?;
        Ok(Response::new(proto::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl NodeService for Plugin {
    async fn node_publish_volume(
        &self,
        req: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        use proto::volume_capability::AccessType;
        let mut r = req.into_inner();
        // The secrets' strings moved, not copied, into memory wiped on drop.
        let secrets: std::collections::HashMap<String, zeroize::Zeroizing<String>> =
            std::mem::take(&mut r.secrets)
                .into_iter()
                .map(|(k, v)| (k, zeroize::Zeroizing::new(v)))
                .collect();
        let cap = r
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        let (block, mount) = match cap.access_type {
            Some(AccessType::Block(_)) => (true, None),
            Some(AccessType::Mount(m)) => (false, Some(m)),
            None => {
                return Err(Status::invalid_argument(
                    "volume capability has no access type",
                ))
            }
        };
        let mount = mount.unwrap_or_default();
        self.blocking(move |n| {
            n.publish(&Publish {
                volume_id: &r.volume_id,
                target: &r.target_path,
                attributes: &r.volume_context,
                secrets: &secrets,
                mount_flags: &mount.mount_flags,
                fs_type: &mount.fs_type,
                block,
                mount_group: &mount.volume_mount_group,
            })
        })
        .await?;
        Ok(Response::new(proto::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        self.blocking(move |n| n.unpublish(&r.target_path)).await?;
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        use proto::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let rpc = |t: Type| proto::NodeServiceCapability {
            r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities: vec![rpc(Type::VolumeMountGroup)],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: self.0.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// Serves until SIGTERM/SIGINT; an error is why it could not start.
pub async fn serve(node: Node, endpoint: &Path) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |e: std::io::Error| format!("--endpoint {}: {e}", endpoint.display());
    // A socket left by a previous run is replaced; anything else at the path is not ours.
    match std::fs::symlink_metadata(endpoint) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(endpoint).map_err(fail)?,
        Ok(_) => return Err(fail(std::io::Error::other("exists and is not a socket"))),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(endpoint).map_err(fail)?;
    std::fs::set_permissions(endpoint, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    let plugin = Plugin(Arc::new(node));
    tracing::info!(endpoint = %endpoint.display(), driver = DRIVER, "CSI node plugin serving");
    crate::telemetry::sd_notify("READY=1");
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => std::future::pending::<()>().await,
        }
        tracing::info!("CSI node plugin stopping; live mounts stay");
    };
    let r = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(plugin.clone()))
        .add_service(NodeServer::new(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop,
        )
        .await;
    let _ = std::fs::remove_file(endpoint);
    r.map_err(|e| format!("gRPC server: {e}"))
}
