//! Property tests (issue 9): whatever an outsider sends to a parser (urls and references,
//! pull secrets and their keys, archives, modules, config files), it answers with a value or a
//! clear error, never a panic, and in time linear in the input.

use proptest::prelude::*;

use crate::auth::Secret;
use crate::auth::dockerconfig::DockerConfig;
use crate::source::Source;

/// Strings biased toward the characters the parsers treat specially.
fn tricky() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9:/@.#?*\\\\ _%\\-\\[\\]\u{0}\u{7f}é]{0,80}")
        .expect("a valid regex")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any url parses or is refused; a parsed OCI reference round-trips through its key.
    #[test]
    fn urls_parse_or_are_refused(s in tricky(), scheme in prop::sample::select(vec!["", "oci://", "http://", "https://", "file://"])) {
        let url = format!("{scheme}{s}");
        if let Ok(src) = Source::parse(&url) {
            let again = Source::parse(&src.location_key());
            prop_assert!(again.is_ok(), "{url} -> {} does not parse", src.location_key());
            prop_assert_eq!(again.unwrap().location_key(), src.location_key());
            let _ = src.to_string();
        }
    }

    /// Any pull secret parses or is refused; matching any registry against its keys ends.
    #[test]
    fn pull_secrets_parse_and_match_without_panics(
        keys in prop::collection::vec(tricky(), 0..8),
        registry in tricky(),
        repo in tricky(),
    ) {
        let auths: Vec<String> = keys
            .iter()
            .map(|k| format!("{}:{{\"username\":\"u\",\"password\":\"p\"}}", serde_json::to_string(k).unwrap()))
            .collect();
        let json = format!("{{\"auths\":{{{}}}}}", auths.join(","));
        if let Ok(cfg) = DockerConfig::parse(&Secret::new(json), 256) {
            let _ = cfg.matching(&registry, &repo);
        }
        let _ = DockerConfig::parse(&Secret::new(registry), 256);
    }

    /// Any bytes, as a download, unwrap to a module or are refused.
    #[test]
    fn archives_unwrap_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..2048), gz in any::<bool>()) {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::cache::store::Store::open(dir.path()).unwrap();
        let data = if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            e.finish().unwrap()
        } else {
            bytes
        };
        let mut f = store.temp_file().unwrap();
        f.write_all(&data).unwrap();
        for entry in [crate::fetch::unpack::TarEntry::First, crate::fetch::unpack::TarEntry::PluginWasm] {
            let _ = crate::fetch::unpack::unwrap(&store, f.path(), 1 << 20, entry, false, None);
        }
        let _ = crate::verify::validate_file(f.path(), None);
    }

    /// Any config text parses into validated settings or a clear error.
    #[test]
    fn config_files_parse_or_are_refused(text in "[a-z_\\[\\]=\". 0-9\n]{0,200}") {
        if let Ok(raw) = crate::config::Config::parse_raw(&text, std::path::Path::new("p.toml")) {
            let _ = raw.validate();
        }
    }
}
