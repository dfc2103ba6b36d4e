//! The built-in connectivity suite (`kubeshift connectivity test`).
//! Not built yet: see the open connectivity issue.
