//! Container images without a registry or Docker: a program and the files
//! its Dockerfile's final stage gives it, written as an OCI image layout
//! archive that `ctr images import` takes.
//!
//! The project's images are `FROM gcr.io/distroless/cc-debian12:nonroot`
//! plus one binary. That base is glibc, CA certificates and a `nonroot`
//! user (65532); here it is made from the host's own files (the libraries
//! `ldd` names, Debian's CA bundle), and the rest of the layout (path, user,
//! entrypoint) is read from the Dockerfile itself, so the two cannot drift:
//! an instruction the builder does not know is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cmd::run;
use crate::Error;

/// The only base the builder knows how to reproduce.
pub const DISTROLESS_CC: &str = "gcr.io/distroless/cc-debian12:nonroot";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The final stage of a Dockerfile, as far as the image's layout goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalStage {
    pub base: String,
    /// `COPY --from=... SRC DST`: the destination paths.
    pub copies: Vec<String>,
    pub user: String,
    pub entrypoint: Vec<String>,
}

/// Reads the last stage of a Dockerfile. Comments and the instructions
/// before the last `FROM` are skipped; in the last stage only `COPY`, `USER`
/// and `ENTRYPOINT` (exec form) are understood, anything else is an error.
pub fn final_stage(dockerfile: &str) -> Result<FinalStage, Error> {
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let start = lines
        .iter()
        .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .ok_or_else(|| Error::Setup("the Dockerfile has no FROM".into()))?;
    let mut stage = FinalStage {
        base: String::new(),
        copies: Vec::new(),
        user: "0:0".into(),
        entrypoint: Vec::new(),
    };
    for line in &lines[start..] {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => {
                stage.base = rest.split_whitespace().next().unwrap_or("").to_string();
            }
            "COPY" => {
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let dst = words
                    .last()
                    .ok_or_else(|| Error::Setup(format!("COPY without a destination: {line}")))?;
                stage.copies.push(dst.to_string());
            }
            "USER" => stage.user = rest.to_string(),
            "ENTRYPOINT" => {
                stage.entrypoint = serde_json::from_str(rest).map_err(|e| {
                    Error::Setup(format!("ENTRYPOINT is not exec form ({e}): {line}"))
                })?;
            }
            other => {
                return Err(Error::Setup(format!(
                    "the final stage has {other}, which the image builder does not reproduce: {line}"
                )));
            }
        }
    }
    Ok(stage)
}

/// One file of an image: its content on the host and where it goes.
#[derive(Clone, Debug)]
pub struct ImageFile {
    pub source: FileSource,
    pub path: String,
    pub mode: u32,
}

#[derive(Clone, Debug)]
pub enum FileSource {
    Host(PathBuf),
    Text(String),
    Directory,
}

/// What goes into an image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The full name containerd registers, e.g.
    /// `docker.io/edgewire/edgewire-agent:0.1.0` (the CRI looks up
    /// `edgewire/edgewire-agent:0.1.0` under that normalized name).
    pub name: String,
    pub files: Vec<ImageFile>,
    pub user: String,
    pub entrypoint: Vec<String>,
}

/// The normalized name of an image reference: Docker Hub's host and the
/// `library/` of single-word names added, as container runtimes store it.
pub fn normalized_name(reference: &str) -> String {
    let first = reference.split('/').next().unwrap_or("");
    let has_host = reference.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_host {
        reference.to_string()
    } else if reference.contains('/') {
        format!("docker.io/{reference}")
    } else {
        format!("docker.io/library/{reference}")
    }
}

/// The shared libraries `ldd` lists for `binary` (the dynamic loader too).
pub fn shared_libraries(ldd_output: &str) -> Vec<String> {
    ldd_output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// The image a Dockerfile's final stage makes of `binary`, with the
/// distroless base recreated from the host's files.
pub fn from_dockerfile(
    dockerfile: &Path,
    binary: &Path,
    reference: &str,
) -> Result<ImageSpec, Error> {
    let text = std::fs::read_to_string(dockerfile)
        .map_err(|e| Error::io(format!("reading {}", dockerfile.display()), e))?;
    let stage = final_stage(&text)?;
    if stage.base != DISTROLESS_CC {
        return Err(Error::Setup(format!(
            "{}: the image builder reproduces {DISTROLESS_CC}, not {}",
            dockerfile.display(),
            stage.base
        )));
    }
    let [destination] = stage.copies.as_slice() else {
        return Err(Error::Setup(format!(
            "{}: the image builder expects one COPY of the binary, found {:?}",
            dockerfile.display(),
            stage.copies
        )));
    };
    let mut files = distroless_cc(binary)?;
    files.push(ImageFile {
        source: FileSource::Host(binary.to_path_buf()),
        path: destination.clone(),
        mode: 0o755,
    });
    Ok(ImageSpec {
        name: normalized_name(reference),
        files,
        user: stage.user,
        entrypoint: stage.entrypoint,
    })
}

/// What `gcr.io/distroless/cc-debian12:nonroot` gives a glibc program:
/// the libraries it links (found by `ldd`), CA certificates, and
/// `/etc/passwd` and `/etc/group` with `nonroot` (65532).
pub fn distroless_cc(binary: &Path) -> Result<Vec<ImageFile>, Error> {
    let ldd = run("ldd", &[&binary.display().to_string()])?;
    let mut files: Vec<ImageFile> = shared_libraries(&ldd)
        .into_iter()
        .map(|lib| ImageFile {
            // The file itself, under the name the loader looks for.
            source: FileSource::Host(
                std::fs::canonicalize(&lib).unwrap_or_else(|_| PathBuf::from(&lib)),
            ),
            path: lib,
            mode: 0o755,
        })
        .collect();
    files.extend([
        ImageFile {
            source: FileSource::Host(PathBuf::from(CA_BUNDLE)),
            path: CA_BUNDLE.into(),
            mode: 0o644,
        },
        ImageFile {
            source: FileSource::Text(
                "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n".into(),
            ),
            path: "/etc/passwd".into(),
            mode: 0o644,
        },
        ImageFile {
            source: FileSource::Text("root:x:0:\nnonroot:x:65532:\n".into()),
            path: "/etc/group".into(),
            mode: 0o644,
        },
        ImageFile {
            source: FileSource::Directory,
            path: "/home/nonroot".into(),
            mode: 0o700,
        },
    ]);
    Ok(files)
}

/// A copy of `binary` in `dir` without its debug information: a debug
/// build's binary is ten times the size of the release one, and every node
/// imports it.
pub fn without_debug_info(binary: &Path, dir: &Path) -> Result<PathBuf, Error> {
    let name = binary
        .file_name()
        .ok_or_else(|| Error::Setup(format!("{} names no file", binary.display())))?;
    let out = dir.join(name);
    std::fs::copy(binary, &out)
        .map_err(|e| Error::io(format!("copying {}", binary.display()), e))?;
    run("strip", &["--strip-debug", &out.display().to_string()])?;
    Ok(out)
}

/// A static program alone, e.g. the pause image.
pub fn single_binary(binary: &Path, path: &str, reference: &str) -> ImageSpec {
    ImageSpec {
        name: normalized_name(reference),
        files: vec![ImageFile {
            source: FileSource::Host(binary.to_path_buf()),
            path: path.into(),
            mode: 0o755,
        }],
        user: String::new(),
        entrypoint: vec![path.into()],
    }
}

pub(crate) fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(kind);
    // Paths are set by append_data, which handles long names.
    let _ = path;
    header
}

/// The single layer: every file, with its parent directories first, owned
/// by root, dated 1970 (the same input gives the same digest).
fn layer(files: &[ImageFile]) -> Result<Vec<u8>, Error> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
    // Programs expect a writable /tmp.
    dirs.insert("tmp".into(), 0o1777);
    for file in files {
        let relative = file.path.trim_start_matches('/');
        let mut parent = Path::new(relative).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.entry(dir.display().to_string()).or_insert(0o755);
            parent = dir.parent();
        }
        if matches!(file.source, FileSource::Directory) {
            dirs.insert(relative.to_string(), file.mode);
        }
    }
    let io = |e| Error::io("writing an image layer", e);
    // BTreeMap order puts every parent before its children.
    for (dir, mode) in &dirs {
        let mut h = header(dir, 0, *mode, tar::EntryType::Directory);
        tar.append_data(&mut h, format!("{dir}/"), std::io::empty())
            .map_err(io)?;
    }
    for file in files {
        let relative = file.path.trim_start_matches('/');
        let data = match &file.source {
            FileSource::Directory => continue,
            FileSource::Text(text) => text.as_bytes().to_vec(),
            FileSource::Host(path) => std::fs::read(path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
        };
        let mut h = header(
            relative,
            data.len() as u64,
            file.mode,
            tar::EntryType::Regular,
        );
        tar.append_data(&mut h, relative, data.as_slice())
            .map_err(io)?;
    }
    tar.into_inner().map_err(io)
}

/// Writes `spec` as an OCI image layout archive at `out`, named with the
/// annotation containerd's import registers it under. Returns the
/// manifest's digest.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<String, Error> {
    let layer = layer(&spec.files)?;
    let layer_digest = sha256(&layer);
    let mut config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "WorkingDir": "/",
            "User": spec.user,
            "Entrypoint": spec.entrypoint,
        },
        // Uncompressed: the layer's digest is its diff id.
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "edgewire-testenv"}],
    });
    if spec.user.is_empty()
        && let Some(c) = config.get_mut("config").and_then(|c| c.as_object_mut())
    {
        c.remove("User");
    }
    let config = serde_json::to_vec(&config).map_err(|e| Error::Setup(e.to_string()))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .map_err(|e| Error::Setup(e.to_string()))?;
    let manifest_digest = sha256(&manifest);
    let tag = spec
        .name
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .map_err(|e| Error::Setup(e.to_string()))?;

    let io = |e| Error::io(format!("writing {}", out.display()), e);
    let file = std::fs::File::create(out).map_err(io)?;
    let mut archive = tar::Builder::new(file);
    let mut put = |path: &str, data: &[u8]| -> Result<(), Error> {
        let mut h = header(path, data.len() as u64, 0o644, tar::EntryType::Regular);
        archive.append_data(&mut h, path, data).map_err(io)
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &index)?;
    for (digest, data) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        put(&format!("blobs/sha256/{hex}"), data)?;
    }
    archive.into_inner().map_err(io)?;
    Ok(manifest_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_stage_is_read_and_earlier_stages_are_not() {
        let dockerfile = r#"# syntax=docker/dockerfile:1
FROM rust:1-bookworm AS build
RUN cargo build --release
# Distroless
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /x /usr/local/bin/x
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/x"]
"#;
        let stage = final_stage(dockerfile).expect("parses");
        assert_eq!(stage.base, DISTROLESS_CC);
        assert_eq!(stage.copies, vec!["/usr/local/bin/x".to_string()]);
        assert_eq!(stage.user, "65532:65532");
        assert_eq!(stage.entrypoint, vec!["/usr/local/bin/x".to_string()]);
    }

    /// The project's Dockerfiles stay within what the builder reproduces, so
    /// the images the tests run are laid out as the released ones.
    #[test]
    fn the_project_images_are_built_as_their_dockerfiles_say() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (dockerfile, binary) in [
            ("operator/Dockerfile", "edgewire-operator"),
            ("node-agent/Dockerfile", "edgewire-agent"),
        ] {
            let text = std::fs::read_to_string(root.join(dockerfile)).expect("Dockerfile");
            let stage = final_stage(&text).expect("a final stage the builder reproduces");
            let path = format!("/usr/local/bin/{binary}");
            assert_eq!(stage.base, DISTROLESS_CC, "{dockerfile}");
            assert_eq!(stage.copies, vec![path.clone()], "{dockerfile}");
            assert_eq!(stage.user, "65532:65532", "{dockerfile}");
            assert_eq!(stage.entrypoint, vec![path.clone()], "{dockerfile}");
            // Any glibc program stands in for the binary.
            let spec = from_dockerfile(
                &root.join(dockerfile),
                Path::new("/bin/true"),
                &format!("edgewire/{binary}:test"),
            )
            .expect("an image spec");
            assert_eq!(spec.name, format!("docker.io/edgewire/{binary}:test"));
            assert_eq!(spec.entrypoint, vec![path.clone()]);
            assert_eq!(spec.user, "65532:65532");
            let paths: Vec<&str> = spec.files.iter().map(|f| f.path.as_str()).collect();
            for wanted in [path.as_str(), CA_BUNDLE, "/etc/passwd", "/etc/group"] {
                assert!(
                    paths.contains(&wanted),
                    "{dockerfile}: {wanted} in {paths:?}"
                );
            }
            assert!(
                paths.iter().any(|p| p.contains("libc.so")),
                "{dockerfile}: glibc in {paths:?}"
            );
        }
    }

    #[test]
    fn an_instruction_the_builder_does_not_reproduce_is_an_error() {
        let dockerfile = "FROM gcr.io/distroless/cc-debian12:nonroot\nENV A=b\n";
        let err = final_stage(dockerfile).expect_err("ENV is not reproduced");
        assert!(err.to_string().contains("ENV"), "{err}");
        assert!(final_stage("FROM x\nENTRYPOINT /bin/sh -c x\n").is_err());
    }

    #[test]
    fn names_are_normalized_as_container_runtimes_store_them() {
        assert_eq!(
            normalized_name("edgewire/edgewire-agent:0.1.0"),
            "docker.io/edgewire/edgewire-agent:0.1.0"
        );
        assert_eq!(normalized_name("busybox:1"), "docker.io/library/busybox:1");
        assert_eq!(
            normalized_name("localhost/pause:3.10"),
            "localhost/pause:3.10"
        );
        assert_eq!(
            normalized_name("registry.example:5000/a/b:1"),
            "registry.example:5000/a/b:1"
        );
    }

    #[test]
    fn ldd_output_gives_every_library_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            shared_libraries(ldd),
            vec![
                "/lib/x86_64-linux-gnu/libgcc_s.so.1".to_string(),
                "/lib/x86_64-linux-gnu/libc.so.6".to_string(),
                "/lib64/ld-linux-x86-64.so.2".to_string(),
            ]
        );
    }

    #[test]
    fn an_archive_holds_an_oci_layout_whose_digests_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ImageSpec {
            name: "localhost/t:1".into(),
            files: vec![ImageFile {
                source: FileSource::Text("hi".into()),
                path: "/a/b/c".into(),
                mode: 0o644,
            }],
            user: "65532:65532".into(),
            entrypoint: vec!["/a/b/c".into()],
        };
        let out = dir.path().join("t.tar");
        let digest = write_archive(&spec, &out).expect("written");
        let mut archive = tar::Archive::new(std::fs::File::open(&out).expect("open"));
        let mut blobs = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
            blobs.insert(path, data);
        }
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).expect("index");
        assert_eq!(index["manifests"][0]["digest"], digest.as_str());
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "localhost/t:1"
        );
        for (path, data) in &blobs {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256(data), format!("sha256:{hex}"));
            }
        }
        let manifest: serde_json::Value = serde_json::from_slice(
            &blobs[&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))],
        )
        .expect("manifest");
        let layer_hex = manifest["layers"][0]["digest"]
            .as_str()
            .expect("layer digest")
            .trim_start_matches("sha256:")
            .to_string();
        let mut layer = tar::Archive::new(blobs[&format!("blobs/sha256/{layer_hex}")].as_slice());
        let paths: Vec<String> = layer
            .entries()
            .expect("layer entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert!(paths.contains(&"a/b/c".to_string()), "{paths:?}");
        let a = paths.iter().position(|p| p == "a/").expect("a/ listed");
        let c = paths
            .iter()
            .position(|p| p == "a/b/c")
            .expect("a/b/c listed");
        assert!(a < c, "parents first: {paths:?}");
    }
}
