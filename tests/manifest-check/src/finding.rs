//! A problem found in the manifests, phrased for the operator who has to fix it.

use std::fmt;

/// One problem: where it is (file, object, container) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// Path as the operator knows it, e.g. `manifests/node.yaml`.
    pub file: String,
    /// `Kind/name` of the object, when the problem is inside one.
    pub object: Option<String>,
    /// The container, when the problem is inside one.
    pub container: Option<String>,
    pub message: String,
}

impl Finding {
    /// A problem with a file as a whole (unreadable YAML, kustomization listing).
    pub fn file(file: &str, message: impl Into<String>) -> Self {
        Finding {
            file: file.to_string(),
            object: None,
            container: None,
            message: message.into(),
        }
    }

    /// Narrow the finding down to one container.
    pub fn in_container(mut self, name: &str) -> Self {
        self.container = Some(name.to_string());
        self
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        if let Some(container) = &self.container {
            write!(f, " container {container}")?;
        }
        write!(f, ": {}", self.message)
    }
}
