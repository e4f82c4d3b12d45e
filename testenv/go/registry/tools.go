//go:build tools

// Pins the registry's Go module for testenv/build.sh.
package tools

import _ "github.com/distribution/distribution/v3/cmd/registry"
