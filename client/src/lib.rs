//! Ferry's device client: the library an app embeds to work offline on a local SQLite database
//! and synchronize it with a Ferry server.
