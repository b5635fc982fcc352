//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.

fn main() {
    let files = [
        "proto/inventory.proto",
        "proto/node.proto",
        "proto/core.proto",
        "proto/mm.proto",
        "proto/pagemap.proto",
        "proto/inet.proto",
        "proto/files.proto",
        "proto/ns.proto",
        "proto/ipc.proto",
        "proto/rpc.proto",
        "proto/net.proto",
        "proto/manifest.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).expect("parse .proto files");
    let mut cfg = prost_build::Config::new();
    cfg.type_attribute(".", "#[derive(serde::Serialize)]");
    cfg.enum_attribute(".", "#[serde(rename_all = \"SCREAMING_SNAKE_CASE\")]");
    // Large binary blobs read better as hex in `ckpt-agent show --json`.
    for field in [
        "ckpt.image.ThreadCore.xsave",
        "ckpt.image.SigInfo.raw",
        "ckpt.image.SeccompFilter.program",
        "ckpt.image.Inventory.signature",
        "ckpt.image.OpenFile.pipe_data",
        "ckpt.image.TcpConnection.send_queue",
        "ckpt.image.TcpConnection.recv_queue",
        "ckpt.image.Datagram.data",
        "ckpt.image.SysvMsg.text",
        "ckpt.image.PosixMsg.data",
        "ckpt.image.Manifest.signature",
        "ckpt.image.ManifestPart.inventory_sha256",
        "ckpt.image.PartFile.sha256",
    ] {
        cfg.field_attribute(field, "#[serde(serialize_with = \"crate::hexbytes\")]");
    }
    cfg.compile_fds(fds)
        .expect("generate Rust from .proto files");
}
