//go:build tools

// Package tools pins the etcd server the nstream testbed builds.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
