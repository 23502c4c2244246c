//! Placeholder until the js template lands.

use super::{DevkitError, Project, TemplateFile, Tools};

/// The template's files.
pub const TEMPLATE: &[TemplateFile] = &[];

/// Builds the project's component.
pub fn build(_project: &Project, _tools: &Tools) -> Result<(), DevkitError> {
    Err(DevkitError::Usage("not yet available".into()))
}
