// kstatus prints the kstatus verdict on Kubernetes objects, as Flux's health checks compute it
// (sigs.k8s.io/cli-utils/pkg/kstatus/status, the library Flux and the cli-utils applier use).
//
// Usage: kstatus < objects.json   (one object, or a List; JSON or YAML)
// Output: one JSON line per object: {"name": ..., "status": "Current|InProgress|Failed|...", "message": ...}
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	doc, err := yaml.YAMLToJSON(data)
	if err != nil {
		fail(err)
	}
	var objects []unstructured.Unstructured
	var probe struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(doc, &probe); err != nil {
		fail(err)
	}
	if probe.Items != nil {
		list := &unstructured.UnstructuredList{}
		if err := list.UnmarshalJSON(doc); err != nil {
			fail(err)
		}
		objects = list.Items
	} else {
		one := unstructured.Unstructured{}
		if err := one.UnmarshalJSON(doc); err != nil {
			fail(err)
		}
		objects = append(objects, one)
	}
	out := json.NewEncoder(os.Stdout)
	for i := range objects {
		u := &objects[i]
		res, err := status.Compute(u)
		if err != nil {
			fail(err)
		}
		if err := out.Encode(verdict{Name: u.GetName(), Status: res.Status.String(), Message: res.Message}); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
